"""The CLIP sidecar: open_clip scoring in its own PyTorch process, and the client that drives it.

`ClipScorer` (client side, no torch) is what the generator and the evaluation code use;
`jip2p.sidecar.server` is the child process, `jip2p.sidecar.protocol` the wire format between them.
"""

from jip2p.sidecar.client import ClipScorer
from jip2p.sidecar.protocol import SCORE_KEYS

__all__ = ["ClipScorer", "SCORE_KEYS"]
