"""Evaluate a pre-trained checkpoint: ``python finetune.py ckpt=PATH [mode=lowshot] [data=...]``."""

from msn.cli.evaluate import main

if __name__ == "__main__":
    main()
