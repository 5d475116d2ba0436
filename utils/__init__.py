"""What both training scripts, sample.py and evaluate.py run on, by topic:

    cli           the flags every script shares, and one-line errors (run_main)
    resume        a run's folder, new or resumed: its settings from the checkpoint, claiming --out
    checkpoint    the checkpoint file: save, load, restore, the networks it holds
    training      one training run: device, seed, data, epochs and steps, Ctrl-C
    log           running means, the progress bar, metrics.jsonl
    sampling      drawing from any trained generator, GAN or VAE
    augment       differentiable augmentation of what a discriminator sees
    pictures      sample grids and curves

Beneath it, system/ holds errors, files, hardware and torchrun's processes.
"""
