"""How good are the samples? Each module answers one question:

    features         the feature network: a classifier trained on the dataset, cached, and its scores
    distances        FID, KID, precision and recall, PSNR, SSIM, class shares: pure functions
    reconstruction   the VAE's ELBO, PSNR and SSIM over a split
    probe            the KID that --eval-every logs during training
    studies          is the synthetic data useful (CAS, augmentation)? is it private (memorisation)?
    report           evaluate.py's tables and eval.json files
"""
