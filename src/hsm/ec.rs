//! Elliptic curves as tokens store them: CKA_EC_PARAMS (a DER OID, or a printable string
//! for Edwards and Montgomery curves on some tokens) read into a [`Curve`], and
//! CKA_EC_POINT (a DER OCTET STRING on most tokens, bare on some) read into the bare public
//! point. The one table of curve OIDs in hsmkeyd.

use std::fmt;

/// A named curve, as CKA_EC_PARAMS names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Curve {
    /// NIST P-256 (prime256v1, secp256r1).
    P256,
    /// NIST P-384 (secp384r1).
    P384,
    /// NIST P-521 (secp521r1).
    P521,
    /// secp256k1.
    Secp256k1,
    /// brainpoolP256r1.
    BrainpoolP256r1,
    /// Ed25519 (edwards25519).
    Ed25519,
    /// Ed448 (edwards448).
    Ed448,
    /// X25519 (curve25519).
    X25519,
    /// X448 (curve448).
    X448,
    /// CKA_EC_PARAMS hsmkeyd does not know, as hex (`None`: the object has none).
    Unknown(Option<String>),
}

/// Every curve hsmkeyd names.
const KNOWN: [Curve; 9] = [
    Curve::P256,
    Curve::P384,
    Curve::P521,
    Curve::Secp256k1,
    Curve::BrainpoolP256r1,
    Curve::Ed25519,
    Curve::Ed448,
    Curve::X25519,
    Curve::X448,
];

/// How a curve's public point is encoded.
enum Point {
    /// SEC1 for a curve over an n-byte field: `04 || X || Y` (2n+1 bytes) or compressed
    /// `02|03 || X` (n+1 bytes).
    Sec1(usize),
    /// The raw public key of this many bytes (RFC 8032 / RFC 7748).
    Raw(usize),
}

impl Curve {
    /// The name the API shows: `P-256`, `secp256k1`, `ed25519`, ... and `unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
            Curve::P521 => "P-521",
            Curve::Secp256k1 => "secp256k1",
            Curve::BrainpoolP256r1 => "brainpoolP256r1",
            Curve::Ed25519 => "ed25519",
            Curve::Ed448 => "ed448",
            Curve::X25519 => "x25519",
            Curve::X448 => "x448",
            Curve::Unknown(_) => "unknown",
        }
    }

    /// CKA_EC_PARAMS of the curve: the DER of its OID (RFC 8410 OIDs for Edwards and
    /// Montgomery curves). `None` for an unknown curve.
    pub fn params(&self) -> Option<&'static [u8]> {
        Some(match self {
            // 1.2.840.10045.3.1.7
            Curve::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            // 1.3.132.0.34
            Curve::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
            // 1.3.132.0.35
            Curve::P521 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23],
            // 1.3.132.0.10
            Curve::Secp256k1 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a],
            // 1.3.36.3.3.2.8.1.1.7
            Curve::BrainpoolP256r1 => &[
                0x06, 0x09, 0x2b, 0x24, 0x03, 0x03, 0x02, 0x08, 0x01, 0x01, 0x07,
            ],
            // 1.3.101.112 .. 1.3.101.111
            Curve::Ed25519 => &[0x06, 0x03, 0x2b, 0x65, 0x70],
            Curve::Ed448 => &[0x06, 0x03, 0x2b, 0x65, 0x71],
            Curve::X25519 => &[0x06, 0x03, 0x2b, 0x65, 0x6e],
            Curve::X448 => &[0x06, 0x03, 0x2b, 0x65, 0x6f],
            Curve::Unknown(_) => return None,
        })
    }

    /// The curve CKA_EC_PARAMS names.
    pub(crate) fn of_params(params: &[u8]) -> Curve {
        // Some tokens name Edwards and Montgomery curves by a PrintableString instead.
        let printable: &[(&[u8], Curve)] = &[
            (b"\x13\x0cedwards25519", Curve::Ed25519),
            (b"\x13\x0aedwards448", Curve::Ed448),
            (b"\x13\x0acurve25519", Curve::X25519),
            (b"\x13\x08curve448", Curve::X448),
        ];
        KNOWN
            .iter()
            .find(|c| c.params() == Some(params))
            .or_else(|| printable.iter().find(|(p, _)| *p == params).map(|(_, c)| c))
            .cloned()
            .unwrap_or_else(|| Curve::Unknown(Some(hex::encode(params))))
    }

    fn point(&self) -> Option<Point> {
        Some(match self {
            Curve::P256 | Curve::Secp256k1 | Curve::BrainpoolP256r1 => Point::Sec1(32),
            Curve::P384 => Point::Sec1(48),
            Curve::P521 => Point::Sec1(66),
            Curve::Ed25519 | Curve::X25519 => Point::Raw(32),
            Curve::Ed448 => Point::Raw(57),
            Curve::X448 => Point::Raw(56),
            Curve::Unknown(_) => return None,
        })
    }

    /// Whether `b` has the shape of a public point of this curve (`None`: unknown curve).
    fn is_point(&self, b: &[u8]) -> Option<bool> {
        Some(match self.point()? {
            Point::Sec1(n) => match b.first() {
                Some(0x04) => b.len() == 2 * n + 1,
                Some(0x02 | 0x03) => b.len() == n + 1,
                _ => false,
            },
            Point::Raw(n) => b.len() == n,
        })
    }
}

impl fmt::Display for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Curve::Unknown(Some(p)) => write!(f, "unknown curve (CKA_EC_PARAMS {p})"),
            Curve::Unknown(None) => f.write_str("unknown curve (no CKA_EC_PARAMS)"),
            known => f.write_str(known.name()),
        }
    }
}

/// The public point in a CKA_EC_POINT value of a key on `curve`: the content of a DER
/// OCTET STRING (short or long form length), or the value itself where the token stores it
/// bare. For a known curve the field size decides: a wrapped value is taken only when its
/// content is a point of the curve, a bare one only when it is one itself, and anything else
/// is `None`, so a bare point is never cut because its first bytes look like a DER header.
/// For an unknown curve a well-formed OCTET STRING is unwrapped and anything else is taken
/// as bare.
pub(crate) fn public_point(raw: &[u8], curve: &Curve) -> Option<Vec<u8>> {
    let wrapped = octet_string(raw);
    match curve.is_point(raw) {
        None => Some(wrapped.unwrap_or(raw).to_vec()),
        Some(bare) => match wrapped {
            Some(content) if curve.is_point(content) == Some(true) => Some(content.to_vec()),
            _ if bare => Some(raw.to_vec()),
            _ => None,
        },
    }
}

/// The content of a DER (or BER definite-length) OCTET STRING that spans all of `der`.
fn octet_string(der: &[u8]) -> Option<&[u8]> {
    let [0x04, first, rest @ ..] = der else {
        return None;
    };
    let (len, content) = if *first < 0x80 {
        (usize::from(*first), rest)
    } else {
        // Long form: the low bits count the length bytes that follow (no point needs
        // more than two; 0x80 alone would be BER's indefinite length).
        let n = usize::from(first & 0x7f);
        if !(1..=2).contains(&n) || rest.len() < n {
            return None;
        }
        let (len, content) = rest.split_at(n);
        let len = len.iter().fold(0usize, |a, b| a << 8 | usize::from(*b));
        (len, content)
    };
    (content.len() == len).then_some(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(content: &[u8]) -> Vec<u8> {
        let mut out = vec![0x04];
        match content.len() {
            n if n < 0x80 => out.push(n as u8),
            n => out.extend([0x81, n as u8]),
        }
        out.extend(content);
        out
    }

    /// `04 || X || Y` with X starting `x0` and the rest filled with `fill`.
    fn sec1(field: usize, x0: u8, fill: u8) -> Vec<u8> {
        let mut p = vec![0x04, x0];
        p.resize(2 * field + 1, fill);
        p
    }

    #[test]
    fn short_form_der_is_unwrapped() {
        let point = sec1(32, 0x11, 7);
        assert_eq!(der(&point)[..2], [0x04, 0x41]);
        assert_eq!(public_point(&der(&point), &Curve::P256), Some(point));
        let ed = [9u8; 32];
        assert_eq!(public_point(&der(&ed), &Curve::Ed25519), Some(ed.to_vec()));
    }

    #[test]
    fn long_form_der_is_unwrapped() {
        let point = sec1(66, 0x01, 7);
        let wrapped = der(&point);
        assert_eq!(wrapped[..3], [0x04, 0x81, 0x85]);
        assert_eq!(public_point(&wrapped, &Curve::P521), Some(point.clone()));
        // Also where the curve is unknown, and with a two-byte length.
        let unknown = Curve::Unknown(None);
        assert_eq!(public_point(&wrapped, &unknown), Some(point.clone()));
        let mut two = vec![0x04, 0x82, 0x00, 0x85];
        two.extend(&point);
        assert_eq!(public_point(&two, &Curve::P521), Some(point));
    }

    #[test]
    fn bare_points_are_taken_as_they_are() {
        for (curve, point) in [
            (Curve::P256, sec1(32, 0x11, 7)),
            (Curve::P384, sec1(48, 0x11, 7)),
            (Curve::P521, sec1(66, 0x01, 7)),
            (Curve::Ed25519, vec![5u8; 32]),
        ] {
            assert_eq!(public_point(&point, &curve), Some(point.clone()), "{curve}");
        }
    }

    #[test]
    fn bare_p256_point_that_looks_like_a_der_header_is_not_cut() {
        // 04 3f: 0x3f = 63 is exactly the number of bytes that follow.
        let point = sec1(32, 0x3f, 7);
        assert_eq!(octet_string(&point).map(<[u8]>::len), Some(63));
        assert_eq!(public_point(&point, &Curve::P256), Some(point.clone()));
        // A bare Ed25519 key can look like a header too: 04 1e + 30 bytes.
        let mut ed = vec![0x04, 0x1e];
        ed.resize(32, 3);
        assert_eq!(public_point(&ed, &Curve::Ed25519), Some(ed));
    }

    #[test]
    fn garbage_is_no_point() {
        let p256 = &Curve::P256;
        for bad in [
            &[][..],
            &[0x04],
            &[0x04, 0x41, 0x04, 0x01],       // length beyond the value
            &[0x04, 0x80, 0x04],             // indefinite length
            &[0x04, 0x83, 0, 0, 3, 1, 2, 3], // three length bytes
            &sec1(32, 1, 1)[..64],           // one byte short
            &der(&sec1(48, 1, 1)),           // a P-384 point
            &der(&[0x05; 65]),               // not SEC1
        ] {
            assert_eq!(public_point(bad, p256), None, "{}", hex::encode(bad));
        }
        assert_eq!(public_point(&[1, 2, 3], &Curve::Ed25519), None);
        // An unknown curve's value is passed on as it is, unless it is an OCTET STRING.
        let unknown = Curve::Unknown(Some("0601".into()));
        assert_eq!(public_point(&[1, 2, 3], &unknown), Some(vec![1, 2, 3]));
    }

    #[test]
    fn params_name_curves_both_ways() {
        for c in KNOWN {
            assert_eq!(Curve::of_params(c.params().unwrap()), c);
        }
        assert_eq!(Curve::of_params(b"\x13\x0cedwards25519"), Curve::Ed25519);
        assert_eq!(
            Curve::of_params(&[0x06, 0x01, 0x00]),
            Curve::Unknown(Some("060100".into()))
        );
        assert_eq!(Curve::Unknown(None).name(), "unknown");
    }
}
