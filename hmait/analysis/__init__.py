"""Analysis of trained models (they read models, never change them): Attention Locality Score,
the quick empirical mask search and cross-layer attention similarity (MaiT paper sections 4.2,
4.3 and appendix A.2)."""
from .als import ALSResult, als_matrix, attention_layers, compute_als, head_als, soft_alphas
from .search import LOWER, STAGES, UPPER, SearchStep, assign_masks, calibrate_masks, search_step
from .similarity import SimilarityResult, layer_similarity

__all__ = ['ALSResult', 'LOWER', 'SearchStep', 'STAGES', 'SimilarityResult', 'UPPER', 'als_matrix',
           'assign_masks', 'attention_layers', 'calibrate_masks', 'compute_als', 'head_als',
           'layer_similarity', 'search_step', 'soft_alphas']
