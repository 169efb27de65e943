"""Loss functions, one module per method; every term is a pure function of tensors.

* ``dcgh``: the DCGH loss (class proxies, pairwise terms, variance).
* ``daph``: the two DAPH stages (data-aware proxy network, then hashing against its codes).

Gathering across workers lives in ``dcgh_dist.distributed``, never here.
"""

from dcgh_dist.losses.daph import (
    anchor_partial_rows,
    anchor_partial_term,
    anchor_same_rows,
    anchor_same_term,
    class_rows,
    class_term,
    daph_anchor_masks,
    daph_hash_loss,
    daph_proxy_loss,
    multilabel_proxy_rows,
    multilabel_proxy_term,
    quantization_rows,
    quantization_term,
    resolve_positive_rule,
)
from dcgh_dist.losses.dcgh import ClassProxies, dcgh_loss, init_proxies, load_proxies_state, proxies_state

__all__ = [
    "ClassProxies",
    "load_proxies_state",
    "proxies_state",
    "anchor_partial_rows",
    "anchor_partial_term",
    "anchor_same_rows",
    "anchor_same_term",
    "class_rows",
    "class_term",
    "daph_anchor_masks",
    "daph_hash_loss",
    "daph_proxy_loss",
    "dcgh_loss",
    "init_proxies",
    "multilabel_proxy_rows",
    "multilabel_proxy_term",
    "quantization_rows",
    "quantization_term",
    "resolve_positive_rule",
]
