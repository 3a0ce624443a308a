from .ade20k import ADE20KDataModule
from .digits import DigitsDataModule
from .digits_segmentation import DigitsSegmentationDataModule
from .imagefolder import ImageFolderDataModule, PredictionCSVWriter

__all__ = ["ADE20KDataModule", "DigitsDataModule", "DigitsSegmentationDataModule", "ImageFolderDataModule",
           "PredictionCSVWriter"]
