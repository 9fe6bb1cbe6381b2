"""LightningCLI entry point for ``config.yaml``: ``LitClassifier`` on ``SpuriousDigitsDataModule``.

    python examples/cli/train.py fit --config examples/cli/config.yaml
"""

from pytorch_lightning.cli import LightningCLI

from lightning_lens.lightning_modules import LitClassifier, SpuriousDigitsDataModule


def main(args=None) -> LightningCLI:
    return LightningCLI(LitClassifier, SpuriousDigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
