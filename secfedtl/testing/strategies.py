"""Hypothesis strategies for secfedtl's protocol messages and dropout patterns.

Use them in your own tests, e.g. ``@given(messages())`` for a codec round trip or
``@given(dropout_maps(n))`` for a simulation. Every value drawn is a *valid* message (its
constructor accepts it); the strategies do not try to be consistent with any session.
"""

from __future__ import annotations

from hypothesis import strategies as st

from secfedtl.secagg import messages as m
from secfedtl.secagg.driver import PHASES

__all__ = [
    "advertise_keys", "consistency_responses", "dropout_maps", "encrypted_shares", "key_directories",
    "masked_inputs", "messages", "party_ids", "share_deliveries", "survivor_lists", "unmask_requests",
    "unmask_responses",
]

party_ids = st.integers(0, m.MAX_PARTY_ID)
session_ids = st.binary(min_size=m.SESSION_ID_BYTES, max_size=m.SESSION_ID_BYTES)
rounds = st.integers(0, m.MAX_ROUND)
_keys = st.binary(min_size=m.PUBLIC_KEY_BYTES, max_size=m.PUBLIC_KEY_BYTES)
_signatures = st.one_of(st.just(b""), st.binary(min_size=m.SIGNATURE_BYTES, max_size=m.SIGNATURE_BYTES))
_ids = st.lists(party_ids, max_size=8, unique=True).map(lambda xs: tuple(sorted(xs)))


def _pairs(blobs: st.SearchStrategy[bytes], max_size: int = 6) -> st.SearchStrategy[tuple]:
    return st.dictionaries(party_ids, blobs, max_size=max_size).map(lambda d: tuple(sorted(d.items())))


def _header() -> dict:
    return {"session_id": session_ids, "round": rounds}


def advertise_keys() -> st.SearchStrategy[m.AdvertiseKeys]:
    return st.builds(m.AdvertiseKeys, sender=party_ids, enc_public_key=_keys, mask_public_key=_keys,
                     signature=_signatures, **_header())


def key_directories() -> st.SearchStrategy[m.KeyDirectory]:
    peers = st.lists(advertise_keys(), max_size=4, unique_by=lambda a: a.sender).map(
        lambda xs: tuple(sorted(xs, key=lambda a: a.sender)))
    return st.builds(m.KeyDirectory, recipient=party_ids, peers=peers, **_header())


def encrypted_shares() -> st.SearchStrategy[m.EncryptedShares]:
    return st.builds(m.EncryptedShares, sender=party_ids, ciphertexts=_pairs(st.binary(max_size=200)), **_header())


def share_deliveries() -> st.SearchStrategy[m.ShareDelivery]:
    return st.builds(m.ShareDelivery, recipient=party_ids, ciphertexts=_pairs(st.binary(max_size=200)), **_header())


def masked_inputs() -> st.SearchStrategy[m.MaskedInput]:
    return st.builds(m.MaskedInput, sender=party_ids, vector=st.binary(max_size=256), **_header())


def survivor_lists() -> st.SearchStrategy[m.SurvivorList]:
    return st.builds(m.SurvivorList, recipient=party_ids, survivors=_ids, **_header())


def consistency_responses() -> st.SearchStrategy[m.ConsistencyResponse]:
    return st.builds(m.ConsistencyResponse, sender=party_ids, signature=_signatures, **_header())


def unmask_requests() -> st.SearchStrategy[m.UnmaskRequest]:
    sigs = _pairs(st.binary(min_size=m.SIGNATURE_BYTES, max_size=m.SIGNATURE_BYTES))
    return st.builds(m.UnmaskRequest, recipient=party_ids, survivors=_ids, dropped=_ids, signatures=sigs,
                     **_header())


@st.composite
def unmask_responses(draw) -> m.UnmaskResponse:
    share = st.binary(min_size=m.SHARE_BYTES, max_size=m.SHARE_BYTES)
    b = draw(_pairs(share))
    owners = {o for o, _ in b}
    k = tuple((o, s) for o, s in draw(_pairs(share)) if o not in owners)
    return m.UnmaskResponse(sender=draw(party_ids), self_mask_shares=b, mask_key_shares=k,
                            session_id=draw(session_ids), round=draw(rounds))


def messages() -> st.SearchStrategy[m.Message]:
    """Any valid protocol message, of every type."""
    return st.one_of(advertise_keys(), key_directories(), encrypted_shares(), share_deliveries(),
                     masked_inputs(), survivor_lists(), consistency_responses(), unmask_requests(),
                     unmask_responses())


def dropout_maps(num_clients: int, *, max_dropouts: int | None = None) -> st.SearchStrategy[dict[int, str]]:
    """``{client: phase}`` maps for :func:`secfedtl.secagg.simulate`."""
    return st.dictionaries(st.integers(0, num_clients - 1), st.sampled_from(PHASES),
                           max_size=num_clients if max_dropouts is None else max_dropouts)
