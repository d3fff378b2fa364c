"""Every published AdaptiveSoftmax number we compare against, in one place.

Source: Baharav et al., "Adaptive Sampling for Efficient Softmax Approximation", NeurIPS 2024, as restated in
`shared/papers/adaptive_softmax.md`. Certified top-k and RF-softmax numbers live in their own packages
(`asoftmax.topk.paper_numbers`, `asoftmax.rff`).
"""

# Paper Figure 2 (synthetic, n = 100, d in [1e3, 1e6], epsilon = 0.3, delta = 0.1, 100 trials).
# The paper gives a figure, not a table: the only number stated in the text is the gain at the largest d for
# the "gaussian" dataset ("> 29x"); the shapes are described qualitatively.
SYNTHETIC = {
    "toy": {"claim": "sample complexity grows sublinearly in d"},
    "gaussian": {"claim": "sample complexity nearly flat in d", "gain_at_max_d_lower_bound": 29.0},
}
