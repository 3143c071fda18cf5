"""Hard limits of protocol version 1.

They bound what a stranger can make us allocate or compute. A verifier may announce
tighter budgets (SessionOpened.max_tree_tokens, vocab size), never looser ones.
Changing a limit here changes what peers accept: treat it as a protocol change.
"""

from __future__ import annotations

# Identifiers.
SESSION_ID_BYTES = 16
SHA256_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
# libp2p protobuf-encoded Ed25519 public key: 08 01 12 20 + 32 key bytes.
ED25519_PUBLIC_KEY_PROTO_BYTES = 36
MAX_PEER_ID_CHARS = 128  # an Ed25519 peer id in base58 is 52 characters
MAX_PAYLOAD_TYPE_BYTES = 64

# Strings.
MAX_MODEL_ID_CHARS = 256
MAX_REVISION_CHARS = 128
MAX_VERSION_CHARS = 32
MAX_ERROR_MESSAGE_CHARS = 1024
MAX_REASON_CHARS = 256

# Tokens and budgets.
MAX_VOCAB_SIZE = 1 << 20  # 1,048,576; the largest current vocabularies are ~260k
MAX_PROMPT_TOKENS = 32_768
MAX_NEW_TOKENS = 32_768
MAX_TREE_TOKENS = 1024  # absolute ceiling; verifiers announce their own budget
MAX_TOP_K = MAX_VOCAB_SIZE
MAX_TEMPERATURE = 100.0
MAX_DRAFT_MICROS = 3_600_000_000  # one hour: a larger claim is nonsense, not cost
MAX_VERIFY_MICROS = 3_600_000_000
MAX_BATCH_TOKENS = 1 << 20
MAX_FREE_SLOTS = 1 << 16
MAX_QUEUE_DEPTH = 1 << 20

# Bytes per frame kind (the serialized Frame, without its length prefix). Each fits
# the largest message that passes validation (strings at 4 UTF-8 bytes a character,
# token ids below MAX_VOCAB_SIZE); a test builds those worst cases.
MAX_ENVELOPE_BYTES = 16 * 1024  # 1024 tokens * (5 + 5) + key, signature, headers
MAX_RECEIPT_ENVELOPE_BYTES = 4 * 1024
FRAME_LIMITS: dict[str, int] = {
    "open": 256 * 1024,  # 32768 prompt tokens * 5 bytes + strings
    "opened": 2 * 1024,
    "verify": MAX_ENVELOPE_BYTES + 16,
    "result": 8 * 1024 + MAX_RECEIPT_ENVELOPE_BYTES,
    "close": 2 * 1024,
    "error": 8 * 1024,
    "advert": 4 * 1024,
    "advert_query": 2 * 1024,
}
# The length prefix is checked against this before a body is read.
MAX_FRAME_BYTES = max(FRAME_LIMITS.values())
MAX_VARINT_BYTES = 9  # libp2p unsigned-varint: at most 63 bits

# Timeouts, seconds. Reads wait for a peer; none may wait forever (a frozen peer
# otherwise hangs a read indefinitely, see notes/libp2p.md).
HANDSHAKE_TIMEOUT = 30.0  # OpenSession -> SessionOpened includes a prefill
RESULT_TIMEOUT = 60.0  # a VerifyRequest may queue behind other sessions' batches
IDLE_TIMEOUT = 300.0  # verifier waiting for a session's next request
BATCH_WAIT = 1.5  # verifier holding a free engine for due requests, in mean passes
WRITE_TIMEOUT = 10.0
ADVERT_TIMEOUT = 5.0
