"""Pre-train MSN: ``python train.py [hydra overrides]``. See README.md and configs/train.yaml."""

from msn.cli.train import main

if __name__ == "__main__":
    main()
