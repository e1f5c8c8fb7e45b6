//! The public half of an asymmetric key, encoded the way clients consume it: the
//! uncompressed point of an EC key (`04 || X || Y`), the raw 32 or 57 bytes of an Edwards or
//! Montgomery key (both as `hsm` hands them, out of their DER wrapping), the DER
//! `RSAPublicKey` (PKCS#1) of an RSA key. Secret keys have none.

use pkcs1::der::asn1::UintRef;
use pkcs1::der::Encode;

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
