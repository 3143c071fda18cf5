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
MAX_SESSIONS = 1 << 16
MAX_PASS_COSTS = 64  # points of an advertised pass-cost curve
MAX_RETRY_AFTER_MS = 3_600_000  # a BUSY verifier asking for more than an hour means "no"
MAX_ETA_MS = 24 * 3_600_000
MAX_STANDING = 1e15  # tokens of credit: far above anything real, far below float trouble
MAX_STANDING_ISSUERS = 32
MAX_STATEMENT_BYTES = 1024

# Bytes per frame kind (the serialized Frame, without its length prefix). Each fits
# the largest message that passes validation (strings at 4 UTF-8 bytes a character,
# token ids below MAX_VOCAB_SIZE); a test builds those worst cases.
MAX_ENVELOPE_BYTES = 16 * 1024  # 1024 tokens * (5 + 5) + key, signature, headers
# A receipt carries an AuditPosition per committed token (at most a tree's depth + 1),
# each with up to MAX_TOP_LOGPROBS alternatives: (1024 + 1) * (20 * 11 + 24) bytes.
MAX_TOP_LOGPROBS = 20  # the OpenAI API's ceiling for top_logprobs
MAX_RECEIPT_ENVELOPE_BYTES = 256 * 1024
# An audit replays at most this many committed tokens (one forward pass); an answer
# carries an AuditPosition (no alternatives) for each.
MAX_AUDIT_TOKENS = 8192
MAX_AUDIT_ANSWER_BYTES = MAX_AUDIT_TOKENS * 24 + 1024
MAX_AUDIT_REQUEST_BYTES = (MAX_PROMPT_TOKENS + MAX_AUDIT_TOKENS) * 5 + 2048
MAX_FRAUD_PROOF_BYTES = 64 * 1024 * 1024
FRAME_LIMITS: dict[str, int] = {
    "open": 257 * 1024,  # 32768 prompt tokens * 5 bytes + strings + a statement
    "opened": 2 * 1024,
    "verify": MAX_ENVELOPE_BYTES + 16,
    "result": 8 * 1024 + MAX_RECEIPT_ENVELOPE_BYTES,
    "close": 2 * 1024,
    "error": 8 * 1024,
    "advert": 8 * 1024,  # with a standing statement and issuer list
    "advert_query": 2 * 1024,
    "progress": 256,
    "audit_request": MAX_AUDIT_REQUEST_BYTES + 16,
    "audit_answer": MAX_AUDIT_ANSWER_BYTES + 16,
}
# The length prefix is checked against this before a body is read.
MAX_FRAME_BYTES = max(FRAME_LIMITS.values())
MAX_VARINT_BYTES = 9  # libp2p unsigned-varint: at most 63 bits

# Liveness and timeouts, in seconds: the one place they are defined.
#
# Busy is not dead. A wait that includes queued work has no fixed deadline: a verifier
# working on a session's prefill or request sends a Progress frame at least every
# HEARTBEAT_INTERVAL, and the node calls it dead only when no frame at all arrived for
# SILENCE_TIMEOUT (a killed or frozen peer; libp2p's health monitor usually notices
# sooner). Against a verifier that keeps talking without getting anywhere, the node
# also requires progress (tokens prefilled, a shorter queue, a new state) within
# `stall_limit(eta)`: a multiple of the verifier's own estimate, which it derives from
# its measured speed (prompt tokens / measured prefill tokens per second, queue ahead /
# measured pass rate), with a floor. Verifiers older than 1.1 send no Progress; for
# them the node falls back to LEGACY_OPEN_TIMEOUT and LEGACY_RESULT_TIMEOUT.
#
# Admission is the verifier's side of the same rule: a session whose prefill could not
# start within its `--admit-wait` (estimated from the queue and measured speed) is
# refused at once with BUSY and a retry-after, instead of being accepted and stalled.
HEARTBEAT_INTERVAL = 1.0
SILENCE_TIMEOUT = 10.0
STALL_FLOOR = 60.0
STALL_FACTOR = 4.0
ADMIT_WAIT = 30.0  # default --admit-wait: queue wait before a new session's prefill
BUSY_WAIT = 120.0  # default node --busy-wait: how long a request waits for a busy network
LEGACY_OPEN_TIMEOUT = 30.0  # 1.0 verifiers: OpenSession -> SessionOpened (with prefill)
LEGACY_RESULT_TIMEOUT = 60.0  # 1.0 verifiers: a request's answer
# Waits for a peer's own next frame (not for queued work): a node must send its
# OpenSession promptly after opening the stream, and a session with no request for
# IDLE_TIMEOUT is closed to free its memory.
HANDSHAKE_TIMEOUT = 30.0
IDLE_TIMEOUT = 300.0
BATCH_WAIT = 1.5  # verifier holding a free engine for due requests, in mean passes
WRITE_TIMEOUT = 10.0
ADVERT_TIMEOUT = 5.0


def stall_limit(eta_s: float) -> float:
    """How long a node waits for progress on work the verifier estimated at `eta_s`."""
    return max(STALL_FLOOR, STALL_FACTOR * max(eta_s, 0.0))
