"""The paper's parts as functions and modules, with no loop and no run folder (method.md step by
step: augment, mixing, ema, losses, consensus, centroids, pseudo_labels, translators, gan_losses).
The loops that use them are in :mod:`diga_fast.stages`."""
