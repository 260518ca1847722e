"""kdkernels: fused knowledge-distillation kernels for PyTorch."""

from kdkernels.functional import (attention_transfer_loss, dist_loss, dkd_loss, fused_linear_kd_loss,
                                  fused_linear_topk_kd_loss, global_num_items, gram, hint_loss, kd_loss,
                                  pairwise_distance, pkt_loss, rkd_angle_loss, rkd_distance_loss,
                                  similarity_preserving_loss, topk_kd_loss, vocab_parallel_fused_linear_kd_loss,
                                  vocab_parallel_kd_loss)
from kdkernels.nn import (AttentionTransferLoss, DISTLoss, DKDLoss, FusedLinearKDLoss, FusedLinearTopKKDLoss, HintAdapter,
                          HintLoss, KDLoss, PKTLoss, RKDAngleLoss, RKDDistanceLoss, SimilarityPreservingLoss, TopKKDLoss)
from kdkernels.ops import available_backends
from kdkernels.tasks import (AttentionDistributionLoss, BoundedRegressionLoss, ClassWeightedSoftCELoss,
                             LocalizationDistillationLoss, PixelwiseKDLoss, attention_distribution_loss,
                             bounded_regression_loss, class_weighted_soft_ce, localization_distillation_loss,
                             pixelwise_kd_loss)

__version__ = "0.1.0"

__all__ = ["AttentionDistributionLoss", "AttentionTransferLoss", "BoundedRegressionLoss",
           "ClassWeightedSoftCELoss", "DISTLoss", "DKDLoss", "FusedLinearKDLoss", "FusedLinearTopKKDLoss",
           "HintAdapter", "HintLoss", "KDLoss", "LocalizationDistillationLoss", "PKTLoss",
           "PixelwiseKDLoss", "RKDAngleLoss", "RKDDistanceLoss", "SimilarityPreservingLoss", "TopKKDLoss",
           "attention_distribution_loss", "attention_transfer_loss", "available_backends",
           "bounded_regression_loss", "class_weighted_soft_ce", "dist_loss", "dkd_loss",
           "fused_linear_kd_loss", "fused_linear_topk_kd_loss", "global_num_items", "gram", "hint_loss", "kd_loss",
           "localization_distillation_loss", "pairwise_distance", "pixelwise_kd_loss", "pkt_loss",
           "rkd_angle_loss", "rkd_distance_loss", "similarity_preserving_loss", "topk_kd_loss",
           "vocab_parallel_fused_linear_kd_loss", "vocab_parallel_kd_loss", "__version__"]
