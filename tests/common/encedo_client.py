"""The Encedo HEM login, client side, written from the appliance's public description (not
from hsmkeyd's code), for tests/encedo_login.rs.

    encedo_client.py URL CA PASSPHRASE_FILE SCOPE MODE

MODE is one of:
  ok                a normal login
  replay            a normal login, then the same eJWT again
  expired           waits past the challenge's exp before answering
  tampered          flips a bit of the HMAC
  wrong-passphrase  derives the key from another passphrase

Prints one JSON object: {"challenge": {...}, "answers": [{"status", "body", "request_id"}]}.
"""

import base64
import hashlib
import hmac
import json
import ssl
import sys
import time
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

HEADER = b'{"ecdh":"x25519","alg":"HS256","typ":"JWT"}'


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def call(ctx, url, method, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}"), r.headers.get("x-request-id")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers.get("x-request-id")


def ejwt(challenge, passphrase, scope, lifetime=600):
    kdf = PBKDF2HMAC(
        algorithm=hashes.SHA256(),
        length=32,
        salt=challenge["eid"].encode(),
        iterations=600000,
    )
    seed = kdf.derive(passphrase)
    me = X25519PrivateKey.from_private_bytes(seed)
    iss = base64.b64encode(
        me.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()
    spk = X25519PublicKey.from_public_bytes(base64.b64decode(challenge["spk"]))
    shared = me.exchange(spk)
    now = int(time.time())
    payload = {
        "jti": challenge["jti"],
        "aud": challenge["spk"],
        "exp": now + lifetime,
        "iat": now,
        "iss": iss,
        "scope": scope,
    }
    signing_input = b64url(HEADER) + "." + b64url(json.dumps(payload, separators=(",", ":")).encode())
    mac = hmac.new(shared, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


def main():
    url, ca, passphrase_file, scope, mode = sys.argv[1:6]
    ctx = ssl.create_default_context(cafile=ca)
    with open(passphrase_file, "rb") as f:
        passphrase = f.read().rstrip(b"\r\n")
    if mode == "wrong-passphrase":
        passphrase = passphrase + b"-not"
    status, challenge, _ = call(ctx, url + "/api/auth/token", "GET")
    assert status == 200, (status, challenge)
    if mode == "expired":
        time.sleep(max(0, challenge["exp"] - time.time()) + 1.5)
    auth = ejwt(challenge, passphrase, scope)
    if mode == "tampered":
        head, payload, mac = auth.split(".")
        raw = bytearray(base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)))
        raw[0] ^= 1
        auth = head + "." + payload + "." + b64url(bytes(raw))
    answers = []
    for _ in range(2 if mode == "replay" else 1):
        status, body, rid = call(ctx, url + "/api/auth/token", "POST", {"auth": auth})
        answers.append({"status": status, "body": body, "request_id": rid})
    print(json.dumps({"challenge": challenge, "answers": answers}))


if __name__ == "__main__":
    main()
