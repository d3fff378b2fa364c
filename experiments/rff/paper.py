"""Published RF-softmax numbers we compare against, in one place.

Source: Rawat, Chen, Yu, Suresh, Kumar, "Sampled Softmax with Random Fourier Features", NeurIPS 2019
(arXiv:1907.10747). The full text could not be read offline and no numeric table value of the paper was
verified, so no number is listed here and the tables carry qualitative claims only: [V] = stated in the
abstract, [R] = recalled from secondary sources, unverified.
"""

# Headline claim (abstract, [V]): low bias in both the sampling distribution and the gradient, with cost
# logarithmic in the number of classes.
CLAIMS = {
    "bias": "RF-softmax bias falls as D grows; only exact softmax sampling is unbiased [abstract, V]",
    "lm": "RF-softmax at moderate D comes close to full softmax / Exp and beats uniform, unigram and "
          "quadratic at equal m (PTB perplexity) [R, no verified numbers]",
    "cost": "sampling cost O(D log n) per sample [V]",
}

# Published perplexities / precisions: none verified (see module docstring).
PTB_PERPLEXITY: dict = {}
EXTREME_PRECISION: dict = {}
EXTREME_DATASETS = ("AmazonCat-13K", "Delicious-200K", "WikiLSHTC-325K")  # [R]
