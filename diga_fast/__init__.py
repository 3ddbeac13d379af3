"""diga-fast: DiGA (CVPR 2023) domain-adaptive semantic segmentation. Layout and the direction of
imports: README.md ("Layout")."""
