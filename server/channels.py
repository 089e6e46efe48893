"""How a client reaches a kiln server: plaintext or TLS (mutual with a client certificate), and the
bearer token every call carries. Shared by `kiln infer`, `kiln models`, `kiln bench` and the locust user.

The files are read once into a `ClientSecurity`, which is plain data: kiln bench pickles it into its
worker processes, which open their own grpc.aio channels with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import grpc

Options = Sequence[tuple[str, object]]


def add_security_flags(parser) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key and --token-file, as every client command spells them."""
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs unless --tls-ca is given")
    parser.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA certificate to trust: connect with TLS")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate, for a server that requires mutual TLS")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="the client certificate's private key")
    parser.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the bearer token to send")


@dataclasses.dataclass(frozen=True)
class ClientSecurity:
    """What a client needs to reach a server: TLS material (bytes) and the bearer token, if any."""

    tls: bool = False
    ca: bytes | None = None  # None with tls: the system's trust store
    cert: bytes | None = None
    key: bytes | None = dataclasses.field(default=None, repr=False)  # secrets stay out of reprs and logs
    token: str | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_files(cls, tls: bool = False, tls_ca: Path | None = None, tls_cert: Path | None = None,
                   tls_key: Path | None = None, token_file: Path | None = None) -> "ClientSecurity":
        """ValueError for a certificate without its key (or the reverse) and for an empty token file;
        OSError for a file that cannot be read."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together (a client certificate and its private key)")
        token = None
        if token_file is not None:
            token = Path(token_file).read_text(encoding="utf-8").strip()
            if not token or any(c.isspace() for c in token):
                raise ValueError(f"{token_file} must hold one bearer token (no spaces)")

        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(
            tls=bool(tls or tls_ca or tls_cert),
            ca=read(tls_ca), cert=read(tls_cert), key=read(tls_key), token=token,
        )

    @classmethod
    def from_args(cls, args) -> "ClientSecurity":
        return cls.from_files(args.tls, args.tls_ca, args.tls_cert, args.tls_key, args.token_file)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What each call sends: the bearer token, or nothing."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def describe(self) -> dict[str, bool]:
        """For reports: what is in use, never the key or the token."""
        return {"tls": self.tls, "client_certificate": self.cert is not None, "token": self.token is not None}

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def channel(self, url: str, options: Options = ()) -> grpc.Channel:
        """A synchronous channel; its calls pass `metadata` themselves."""
        if self.tls:
            return grpc.secure_channel(url, self._credentials(), options=list(options))
        return grpc.insecure_channel(url, options=list(options))

    def aio_channel(self, url: str, options: Options = ()) -> grpc.aio.Channel:
        if self.tls:
            return grpc.aio.secure_channel(url, self._credentials(), options=list(options))
        return grpc.aio.insecure_channel(url, options=list(options))
