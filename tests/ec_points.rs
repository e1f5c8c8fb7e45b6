//! EC public keys through the daemon, against real SoftHSM tokens: the point
//! `GET /api/keymgmt/get/<kid>` hands out is the bare uncompressed point, whatever length
//! its DER wrapping has (P-521's needs the long form) and whether or not the token wraps it
//! at all (a bare point must never be cut because its first bytes look like a DER header).

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{Daemon, Setup, Token};

const P521: &str = "521e";
const BARE: &str = "ba3f";

/// The public key `GET /api/keymgmt/get/<kid>` hands out, decoded.
fn pubkey(d: &Daemon, kid: &str) -> (String, Vec<u8>) {
    let g = d.client().get(&format!("/api/keymgmt/get/{kid}")).ok();
    let pk = g["pubkey"]
        .as_str()
        .unwrap_or_else(|| panic!("no pubkey for {kid}: {g}"));
    (
        g["type"].as_str().unwrap_or_default().to_string(),
        STANDARD.decode(pk).unwrap(),
    )
}

#[test]
fn p521_public_key_is_the_point_pkcs11_tool_exports() {
    let t = Token::new();
    t.gen("ec-p521", P521, "p521-key", &[]);
    let d = Daemon::start(&t, &Setup::default());
    let (kind, point) = pubkey(&d, P521);
    assert_eq!(kind, "PKEY,ExDSA,SECP521R1");
    // 04 || X || Y with 66-byte coordinates; its DER wrapping (04 81 85 ...) needs the
    // long form of the length.
    assert_eq!(
        (point.len(), point[0]),
        (133, 0x04),
        "uncompressed P-521 point, not DER: {}",
        hex::encode(&point)
    );
    // The SubjectPublicKeyInfo ends with the BIT STRING holding the point.
    let spki = t.public_key_der(P521);
    assert!(
        spki.ends_with(&point),
        "pkcs11-tool exports {}, the daemon {}",
        hex::encode(&spki),
        hex::encode(&point)
    );
    assert_eq!(d.stop(), 0);
}

#[test]
fn bare_p256_point_whose_x_starts_with_0x3f_comes_back_whole() {
    // 0x3f is 63, the length of what follows the two bytes `04 3f`: read as a DER header,
    // it would cut the point to its last 63 bytes.
    let mut point = vec![0x04, 0x3f];
    point.extend((1..64u8).map(|i| i.wrapping_mul(37)));
    assert_eq!(point.len(), 65);
    let t = Token::new();
    t.devtoken(&[
        "raw-ec-public",
        "--id",
        BARE,
        "--label",
        "bare-point",
        "--kind",
        "ec-p256",
        "--ec-point",
        &hex::encode(&point),
    ]);
    let d = Daemon::start(&t, &Setup::default());
    let key = d.client().get(&format!("/v1/keys/{BARE}")).ok();
    assert_eq!(
        (&key["class"], &key["curve"]),
        (&"public-only".into(), &"P-256".into()),
        "{key}"
    );
    let (kind, got) = pubkey(&d, BARE);
    assert_eq!(kind, "SECP256R1");
    assert_eq!(hex::encode(got), hex::encode(&point));
    assert_eq!(d.stop(), 0);
}
