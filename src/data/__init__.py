from .digits import DigitsDataModule
from .imagefolder import ImageFolderDataModule, PredictionCSVWriter

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "PredictionCSVWriter"]
