"""Evaluate a pre-trained checkpoint: ``python finetune.py ckpt=PATH [mode=lowshot] [data=...]``."""

from msn.finetune import main

if __name__ == "__main__":
    main()
