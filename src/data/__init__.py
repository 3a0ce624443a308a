from .digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
