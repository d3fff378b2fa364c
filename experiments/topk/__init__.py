"""topk experiments."""
