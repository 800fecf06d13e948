"""Every exception secfedtl raises, under one root: :class:`SecFedTLError`.

Errors are split by who broke the rules (the h11 habit):

* :class:`LocalProtocolError` -- we were asked to do something illegal (wrong state, bad call).
* :class:`RemoteProtocolError` -- a peer (server or client) sent something illegal. The specific
  refusals a client makes against a misbehaving server are subclasses, so callers and tests can
  tell them apart.

Input errors (bad shapes, NaN, out-of-range configuration) subclass ``ValueError`` as well, so code
that already catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class SecFedTLError(Exception):
    """Root of every exception raised by secfedtl."""


# --- configuration and input -------------------------------------------------------------------


class ConfigError(SecFedTLError, ValueError):
    """A configuration that is malformed or cannot meet its stated guarantees."""


class InputError(SecFedTLError, ValueError):
    """A value handed to secfedtl has the wrong shape, type, or contains NaN/inf."""


class EncodingError(InputError):
    """A vector cannot be encoded (wrong length, non-finite values, out of the field)."""


class DataError(SecFedTLError, ValueError):
    """A bundled or user data file is missing, corrupt, or does not match its checksum."""


# --- wire format -------------------------------------------------------------------------------


class DecodeError(SecFedTLError, ValueError):
    """Bytes that are not a valid secfedtl message: bad magic, unknown version or type tag,
    truncated or oversized fields, trailing bytes, or field values that fail validation."""


class MessageError(SecFedTLError, ValueError):
    """A message value failed validation when it was built."""


# --- cryptography ------------------------------------------------------------------------------


class CryptoError(SecFedTLError):
    """A cryptographic operation failed."""


class DecryptionError(CryptoError):
    """An AEAD ciphertext did not authenticate (tampered, wrong key, or wrong binding)."""


class SignatureError(CryptoError):
    """A signature did not verify."""


class ReconstructionError(CryptoError):
    """Secret sharing reconstruction failed (too few or inconsistent shares)."""


# --- protocol ----------------------------------------------------------------------------------


class ProtocolError(SecFedTLError):
    """Base of protocol violations; a client session that raises one is ABORTED."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow in the current state."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol does not allow."""


class WrongSessionError(RemoteProtocolError):
    """A message belongs to another session, round, or recipient."""


class ReplayError(RemoteProtocolError):
    """A message was received twice, or arrived in a phase that is already over."""


class InconsistentDropoutError(RemoteProtocolError):
    """The server's survivor/dropped lists are contradictory: a peer listed both as surviving
    and dropped, a peer reported dropped after it was confirmed surviving, or a request for
    shares the client never agreed to reveal."""


class AuthenticationError(RemoteProtocolError):
    """A signature on advertised keys or on the survivor list is missing or invalid."""


class UnknownPartyError(AuthenticationError):
    """A session names a party whose long-term key is not in this node's pinned roster, names a
    roster party twice, or does not place this node at the index it was given."""


class PolicyError(RemoteProtocolError):
    """The server proposed a session this node's policy refuses: fewer parties, a lower
    threshold or graph degree, less collusion tolerance, or more sessions than it accepts."""


class TooFewSurvivorsError(SecFedTLError):
    """Fewer participants than the threshold remain; the aggregate cannot be computed safely.

    Raised by a client that refuses to continue, and by the server (or :func:`simulate`) when a
    phase ends with too few participants, or when the shares that came back cannot recover the
    sum (too few from clients not caught lying). Never accompanied by a partial result."""


# --- privacy -----------------------------------------------------------------------------------


class PrivacyError(SecFedTLError):
    """Base of privacy-accounting errors."""


class PrivacyBudgetExceeded(PrivacyError):
    """Running the requested mechanism would take a client past its epsilon budget.

    Raised before anything is trained or recorded."""


class AccountingError(PrivacyError, ValueError):
    """Invalid accountant input (sample rate outside (0, 1], non-positive noise, bad delta...)."""


class LedgerError(PrivacyError):
    """The privacy ledger is malformed or cannot be written."""


class LedgerTamperedError(LedgerError):
    """The ledger's hash chain is broken: a line was changed, removed, reordered or inserted."""


# --- training and models -----------------------------------------------------------------------


class ModelError(SecFedTLError):
    """A model or checkpoint cannot be loaded or does not fit the task."""


class TrainingError(SecFedTLError):
    """Local private training failed (diverged, non-finite loss, unsupported layer)."""


class AggregationError(SecFedTLError):
    """Server-side aggregation failed (empty or inconsistent aggregate)."""
