"""munba_kernels: machine unlearning by Nash bargaining, as a drop-in PyTorch optimizer.

Public API:
    MUNBaOptimizer        the optimizer (replaces AdamW / SGD in an unlearning loop)
    bargaining_weights    closed-form Nash weights [alpha_f, alpha_r] from a 2×2 Gram matrix
    solve_bargain         the same with cos φ, status, ‖d‖ and clip scale (batched, on device)
    Bargain, BargainStatus  the result type and its degenerate-case codes
    GradScaler            fp16 loss scaler that also inf-checks the captured forget gradient (amp.py)
"""

from .amp import GradScaler
from .bargaining import Bargain, BargainStatus, bargaining_weights, solve_bargain
from .optim import MUNBaOptimizer

__all__ = ["MUNBaOptimizer", "bargaining_weights", "solve_bargain", "Bargain", "BargainStatus", "GradScaler"]
__version__ = "0.1.0"
