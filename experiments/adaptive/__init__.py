"""adaptive experiments."""
