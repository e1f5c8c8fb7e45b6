//! The public half of an asymmetric key, encoded the way clients consume it: the
//! uncompressed point of an EC key (`04 || X || Y`), the raw 32 or 57 bytes of an Edwards or
//! Montgomery key (both as `hsm` hands them, out of their DER wrapping), the DER
//! `RSAPublicKey` (PKCS#1) of an RSA key. Secret keys have none.

use pkcs1::der::asn1::UintRef;
use pkcs1::der::Encode;

use serde_json::{json, Value};

use super::model::{Curve, KeyType, KeyView};
use crate::hsm::{Algorithm, ObjectInfo, ObjectKind, PublicParts};

/// The object whose public parts are read: the public key, or for RSA the private key
/// (which carries modulus and exponent). `None` for secret keys and for EC private keys
/// without their public half.
pub fn source(objects: &[ObjectInfo]) -> Option<&ObjectInfo> {
    objects
        .iter()
        .find(|o| o.kind == ObjectKind::PublicKey)
        .or_else(|| {
            objects
                .iter()
                .find(|o| o.kind == ObjectKind::PrivateKey && o.algorithm == Some(Algorithm::Rsa))
        })
}

/// Encodes the public key of an object of this algorithm, or `None` when the token did not
/// give the parts it needs.
pub fn encode(algorithm: Option<&Algorithm>, parts: &PublicParts) -> Option<Vec<u8>> {
    match algorithm? {
        Algorithm::Ec | Algorithm::EcEdwards | Algorithm::EcMontgomery => parts.ec_point.clone(),
        Algorithm::Rsa => {
            let key = pkcs1::RsaPublicKey {
                modulus: UintRef::new(parts.modulus.as_deref()?).ok()?,
                public_exponent: UintRef::new(parts.public_exponent.as_deref()?).ok()?,
            };
            key.to_der().ok()
        }
        _ => None,
    }
}

/// The SubjectPublicKeyInfo (RFC 5280) of a key, PEM, from the public half [`encode`]
/// gave: `None` for key types without one.
pub fn pem(view: &KeyView, public: &[u8]) -> Option<String> {
    use spki::der::asn1::{AnyRef, BitStringRef, ObjectIdentifier};
    use spki::der::{pem::LineEnding, EncodePem};
    const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
    const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
    const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
    let curve_params;
    let (oid, parameters) = match (&view.key_type, &view.curve) {
        (KeyType::Ec, Some(c)) => {
            curve_params = c.params()?;
            (EC_PUBLIC_KEY, Some(AnyRef::try_from(curve_params).ok()?))
        }
        (KeyType::Rsa, _) => (RSA_ENCRYPTION, Some(AnyRef::NULL)),
        (KeyType::Edwards(Curve::Ed25519), _) => (ED25519, None),
        _ => return None,
    };
    let info = spki::SubjectPublicKeyInfo {
        algorithm: spki::AlgorithmIdentifier { oid, parameters },
        subject_public_key: BitStringRef::from_bytes(public).ok()?,
    };
    info.to_pem(LineEnding::LF).ok()
}

/// The public key as a JWK (RFC 7517/7518/8037), with `kid`, and `key_ops`/`use` from the
/// key's public usage flags: `None` for key types without one.
pub fn jwk(view: &KeyView, public: &[u8]) -> Option<Value> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let mut key = match (&view.key_type, &view.curve) {
        (KeyType::Ec, Some(c)) => {
            let crv = match c {
                Curve::P256 | Curve::P384 | Curve::P521 => c.name(),
                _ => return None,
            };
            let xy = public.strip_prefix(&[0x04])?;
            let (x, y) = xy.split_at(xy.len() / 2);
            json!({"kty": "EC", "crv": crv, "x": B64.encode(x), "y": B64.encode(y)})
        }
        (KeyType::Edwards(Curve::Ed25519), _) => {
            json!({"kty": "OKP", "crv": "Ed25519", "x": B64.encode(public)})
        }
        (KeyType::Rsa, _) => {
            use pkcs1::der::Decode;
            let k = pkcs1::RsaPublicKey::from_der(public).ok()?;
            json!({"kty": "RSA", "n": B64.encode(k.modulus.as_bytes()),
                   "e": B64.encode(k.public_exponent.as_bytes())})
        }
        _ => return None,
    };
    let a = &view.attributes;
    let ops: Vec<&str> = [
        (a.verify, "verify"),
        (a.encrypt, "encrypt"),
        (a.wrap, "wrapKey"),
    ]
    .into_iter()
    .filter_map(|(on, op)| on.then_some(op))
    .collect();
    let obj = key.as_object_mut()?;
    let _ = obj.insert("kid".into(), json!(view.kid));
    if a.verify && !a.encrypt && !a.wrap {
        let _ = obj.insert("use".into(), json!("sig"));
    } else if !a.verify && (a.encrypt || a.wrap) {
        let _ = obj.insert("use".into(), json!("enc"));
    }
    let _ = obj.insert("key_ops".into(), json!(ops));
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_is_pkcs1_der_and_ec_points_are_passed_on() {
        let parts = PublicParts {
            modulus: Some(vec![0x00, 0xc3, 0x01]),
            public_exponent: Some(vec![0x01, 0x00, 0x01]),
            ..PublicParts::default()
        };
        // SEQUENCE { INTEGER 0x00c301 (leading zero kept: high bit set), INTEGER 65537 }
        assert_eq!(
            encode(Some(&Algorithm::Rsa), &parts).unwrap(),
            [0x30, 0x0a, 0x02, 0x03, 0x00, 0xc3, 0x01, 0x02, 0x03, 0x01, 0x00, 0x01]
        );
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let ec = PublicParts {
            ec_point: Some(point.clone()),
            ..PublicParts::default()
        };
        assert_eq!(encode(Some(&Algorithm::Ec), &ec).unwrap(), point);
        assert_eq!(encode(Some(&Algorithm::Aes), &ec), None);
        assert_eq!(encode(Some(&Algorithm::Rsa), &ec), None);
    }
}
