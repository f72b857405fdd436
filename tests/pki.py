"""The test CA: the package's throwaway certificate authority (proxy.pki)."""

from proxy.pki import Pki, make_pki

__all__ = ["Pki", "make_pki"]
