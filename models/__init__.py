"""Hand-written generative models for BloodMNIST-64."""
