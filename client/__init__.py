"""flashserve: FlashAttention as a network service.

Swap `from flash_attn import flash_attn_func` for `from flashserve import flash_attn_func` and the
attention runs on a flashserve server: `flashserve.connect("host:port")` or FLASHSERVE_TARGET."""
from .client import Client, connect, default_client
from .errors import RemoteError, ResidualsEvicted
from .functional import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                         flash_attn_unpadded_func, flash_attn_unpadded_kvpacked_func,
                         flash_attn_unpadded_qkvpacked_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                         flash_attn_varlen_qkvpacked_func)
from .modules import FlashCrossAttention, FlashSelfAttention

__version__ = "0.1.0"

__all__ = [
    "Client", "connect", "default_client", "RemoteError", "ResidualsEvicted",
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_unpadded_func",
    "flash_attn_unpadded_qkvpacked_func", "flash_attn_unpadded_kvpacked_func", "FlashSelfAttention",
    "FlashCrossAttention",
]
