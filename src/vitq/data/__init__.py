"""Datasets, preprocessing and calibration sampling.

* :mod:`~vitq.data.fashion`: Fashion-MNIST straight from its IDX files (the reference models' data);
* :mod:`~vitq.data.preprocess`: how images become model inputs - a :class:`PreprocessConfig` the
  model's adapter derives from the model, applied by the model library's own transform to image
  files and by :class:`Preprocess` to image tensors (:class:`Transforms`);
* :mod:`~vitq.data.folders`: ``--data`` / ``--calib-data`` specs, ImageNet-layout and unlabeled
  image folders, the seeded calibration sample, loaders.
"""

from .fashion import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, FashionMNIST, read_idx
from .folders import (
    IMAGE_EXTENSIONS,
    NO_LABEL,
    CalibrationSet,
    DataSpec,
    ImageFiles,
    build_dataset,
    calibration_images,
    calibration_subset,
    check_classes,
    eval_subset,
    folder_classes,
    make_loader,
    read_image,
    stack_images,
)
from .preprocess import CROP_MODES, INTERPOLATIONS, Preprocess, PreprocessConfig, Transforms, fit_channels, pil_mode

__all__ = ["CROP_MODES", "DEBIAN_FASHION_MNIST", "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES", "IMAGE_EXTENSIONS",
           "INTERPOLATIONS", "NO_LABEL", "CalibrationSet", "DataSpec", "FashionMNIST", "ImageFiles", "Preprocess",
           "PreprocessConfig", "Transforms", "build_dataset", "calibration_images", "calibration_subset", "check_classes",
           "eval_subset", "fit_channels", "folder_classes", "make_loader", "pil_mode", "read_idx", "read_image", "stack_images"]
