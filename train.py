"""Train one model: `python train.py aug=cutmix smoothing=0.1` (`vitexp-train` once installed; `--help` lists
every option). The entry point itself is `vitexp.train`."""

from vitexp.train import main

if __name__ == "__main__":
    main()
