"""Hand-written networks and what is pure about them: the DCGAN (dcgan.py), the VAE (vae.py), the
feature network's classifier (classifier.py) and BatchNorm over processes (sync_batchnorm.py)."""
