"""The defaults every entry point shares (the CLI, ``vitq.quantize``, ``RunSpec``): one place each."""

#: the model when none is named: the reference ViT, which comes with its own data (Fashion-MNIST)
DEFAULT_MODEL = "fmnist-vit"
#: the recipe when none is named: the composition that scores highest at every width (bench/results/best.md);
#: calibration only (seconds) at 6-8-bit activations, reconstruction below (minutes to hours on a CPU)
DEFAULT_RECIPE = "best"
#: the recipe offered instead when the default would reconstruct: calibration only, seconds at any width
FAST_RECIPE = "repq"
#: the bit-width when none is named
DEFAULT_BITS = "W8A8"
#: an encoder's k-NN evaluation (the DINO protocol): k nearest train-split embeddings, and the bank's default size
KNN_K = 20
DEFAULT_KNN_BANK = 10000

__all__ = ["DEFAULT_BITS", "DEFAULT_KNN_BANK", "DEFAULT_MODEL", "DEFAULT_RECIPE", "FAST_RECIPE", "KNN_K"]
