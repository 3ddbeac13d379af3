"""Fused Triton kernels of diga-fast, each beside its plain-PyTorch reference (``*_ref``).

Every op takes ``backend=None | "triton" | "torch"``: ``None`` runs Triton on CUDA tensors and the
reference otherwise; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (set before import).
The modules live in the repository's top-level kernels/ (``diga_fast.with_checkout_folder``).
"""

from diga_fast import with_checkout_folder

__path__ = with_checkout_folder(__path__, "kernels")

from ._common import default_backend
from .assign_centroids import assign_centroids, assign_centroids_ref
from .class_feature_sums import class_feature_sums, class_feature_sums_ref
from .consensus_cross_entropy import consensus_cross_entropy, consensus_cross_entropy_ref
from .crdomix_blend import crdomix_blend, crdomix_blend_ref

__all__ = [
    "assign_centroids",
    "assign_centroids_ref",
    "class_feature_sums",
    "class_feature_sums_ref",
    "consensus_cross_entropy",
    "consensus_cross_entropy_ref",
    "crdomix_blend",
    "crdomix_blend_ref",
    "default_backend",
]
