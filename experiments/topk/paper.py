"""Every published number of the certified top-k paper we compare against, in one place.

Source: Tzachristas, Deng, Tzachristas, Zhang, Chen, "Certified Top-k attention via total variation",
arXiv:2512.07647 (Dec 2025): its BERT experiment with MC-Search (Algorithm 2, Theorem 7.2). The BERT numbers
come from a third-party research note quoting the paper's PDF (not read here directly); numbers for other
epsilons were not available.
"""

# bert-base-uncased, all 12 layers x 12 heads, MC-Search at epsilon = 0.01: mean keys scored of n.
BERT_MC_SEARCH = {
    "model": "bert-base-uncased (12 layers x 12 heads, hidden 768)",
    "epsilon": 0.01,
    "keys_scored": {128: 58.8, 256: 107.8},
    "speedup": {128: 2.2, 256: 2.4},  # n / k_mc, as stated ("2.2x and 2.4x fewer scored keys")
    "abstract_claim": "2-4x fewer scored keys on average while meeting the TV budget",
}

# Not from the paper: our own simulation at n = 2e5 of the Gaussian score model of the paper's Sec. 6 (empirical /
# predicted k_eps / n, rule k_eps / n = Phi_c(sigma + Phi^-1(eps))), kept for reference (no code reads it).
GAUSSIAN_SIMULATION_SPEC = {
    (1.0, 0.1): (0.610, 0.611), (1.0, 0.01): (0.908, 0.908),
    (2.0, 0.1): (0.239, 0.236), (2.0, 0.01): (0.626, 0.628),
    (3.0, 0.1): (0.045, 0.043), (3.0, 0.01): (0.265, 0.250),
}
