from .ade20k import ADE20KDataModule
from .coco import COCODataModule
from .digits import DigitsDataModule
from .digits_detection import DigitsDetectionDataModule
from .digits_segmentation import DigitsSegmentationDataModule
from .imagefolder import ImageFolderDataModule

__all__ = ["ADE20KDataModule", "COCODataModule", "DigitsDataModule", "DigitsDetectionDataModule",
           "DigitsSegmentationDataModule", "ImageFolderDataModule"]
