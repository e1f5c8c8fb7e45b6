//! `hsmkeyd-devtoken`: a development and test helper that puts keys into a
//! PKCS#11 token (SoftHSM2 in practice) through `cryptoki` directly.
//!
//! This is a dev/test tool, NOT part of the daemon: `softhsm-setup.sh` uses it
//! to create the demo keys and the integration tests use it to plant keys
//! (including ones `pkcs11-tool` cannot make, e.g. `CKA_MODIFIABLE=false`) and
//! hand-crafted data objects. It deliberately does no duplicate-id checks.
//!
//! `SOFTHSM2_CONF` is taken from the caller's environment. Every error is
//! reported as one line on stderr with exit status 1.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use hsmkeyd::hsm::Curve;
use rand::rngs::OsRng;
use rand::TryRngCore;
use zeroize::{Zeroize, Zeroizing};

type Res<T> = Result<T, String>;
type MakeFlag = fn(bool) -> Attribute;

/// Adds context to an error, turning it into the one-line message printed.
trait Ctx<T> {
    fn ctx(self, what: impl std::fmt::Display) -> Res<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl std::fmt::Display) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

#[derive(Parser)]
#[command(
    name = "hsmkeyd-devtoken",
    about = "Dev/test tool: create keys in a PKCS#11 (SoftHSM2) token. Not part of the daemon."
)]
struct Cli {
    /// PKCS#11 module to load.
    #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
    module: PathBuf,
    /// Label of the token to use (compared after trimming padding).
    #[arg(long)]
    token_label: String,
    /// File holding the user PIN (one trailing newline is ignored).
    #[arg(long)]
    pin_file: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate one key (or key pair) and print its kid (hex CKA_ID).
    Gen(GenArgs),
    /// Create COUNT AES-256 keys quickly (random values, AES-256, encrypt/decrypt).
    Bulk(BulkArgs),
    /// Idempotently create the demo keys (skips labels that already exist).
    Demo,
    /// Create a CKO_DATA object (token, private) with the given attributes.
    RawData(RawDataArgs),
    /// Create a lone EC public-key object (token, CKK_EC) with CKA_EC_POINT exactly as
    /// given: tokens differ in whether they DER-wrap the point, and this stores either.
    RawEcPublic(RawEcPublicArgs),
}

#[derive(Args)]
struct RawEcPublicArgs {
    /// CKA_ID as hex.
    #[arg(long, value_parser = hex_arg)]
    id: Hex,
    #[arg(long)]
    label: String,
    /// The curve (CKA_EC_PARAMS): ec-p256, ec-p384 or ec-p521.
    #[arg(long, value_enum)]
    kind: Kind,
    /// CKA_EC_POINT as hex, stored verbatim.
    #[arg(long, value_parser = hex_arg)]
    ec_point: Hex,
}

#[derive(Args)]
struct BulkArgs {
    #[arg(long)]
    count: u32,
    /// Id prefix as hex; the 4-byte big-endian index is appended.
    #[arg(long, value_parser = hex_arg)]
    id_prefix: Hex,
    #[arg(long, default_value = "bulk-")]
    label_prefix: String,
}

#[derive(Args)]
struct RawDataArgs {
    #[arg(long)]
    label: String,
    #[arg(long)]
    application: String,
    /// File whose raw bytes become CKA_VALUE.
    #[arg(long)]
    value_file: PathBuf,
}

#[derive(Args)]
struct GenArgs {
    #[arg(long, value_enum)]
    kind: Kind,
    /// CKA_ID as hex.
    #[arg(long, value_parser = hex_arg)]
    id: Hex,
    /// CKA_LABEL for every object created.
    #[arg(long)]
    label: String,
    /// Key pairs only: CKA_LABEL of the public object, when it is to differ from --label
    /// (as a half-made relabelling would leave it).
    #[arg(long)]
    public_label: Option<String>,
    /// Set CKA_MODIFIABLE=false on every object created.
    #[arg(long)]
    non_modifiable: bool,
    /// Secret and private keys: CKA_SENSITIVE=false (to try PKCS#11's one-way rules).
    #[arg(long)]
    not_sensitive: bool,
    /// Secret and private keys: CKA_EXTRACTABLE=true (to try PKCS#11's one-way rules).
    #[arg(long)]
    extractable: bool,
    /// Set CKA_DESTROYABLE=false on every object created.
    #[arg(long)]
    non_destroyable: bool,
    /// Key pairs only: destroy the public object after generation.
    #[arg(long, conflicts_with = "public_only")]
    private_only: bool,
    /// Key pairs only: destroy the private object after generation.
    #[arg(long)]
    public_only: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Aes256,
    Aes128,
    EcP256,
    EcP384,
    EcP521,
    Rsa2048,
    Ed25519,
    GenericSecret,
}

/// Non-empty byte string given as hex on the command line.
#[derive(Clone)]
struct Hex(Vec<u8>);

fn hex_arg(s: &str) -> Result<Hex, String> {
    match hex::decode(s) {
        Ok(b) if b.is_empty() => Err("must not be empty".into()),
        Ok(b) => Ok(Hex(b)),
        Err(e) => Err(format!("not valid hex: {e}")),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help / --version
        Err(e) => {
            // One line: clap's message up to its first blank line, joined.
            let msg = e.render().to_string();
            let lines = msg.lines().map(str::trim).take_while(|l| !l.is_empty());
            let msg = lines.collect::<Vec<_>>().join(" ");
            eprintln!("hsmkeyd-devtoken: {msg} (see --help)");
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsmkeyd-devtoken: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Res<()> {
    if let Cmd::Gen(g) = &cli.command {
        let pair = !matches!(g.kind, Kind::Aes256 | Kind::Aes128 | Kind::GenericSecret);
        if !pair && (g.private_only || g.public_only || g.public_label.is_some()) {
            return Err(
                "--private-only/--public-only/--public-label only apply to key pairs".into(),
            );
        }
    }
    let pin = read_pin(&cli.pin_file)?;
    let pkcs11 =
        Pkcs11::new(&cli.module).ctx(format!("loading PKCS#11 module {}", cli.module.display()))?;
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .ctx("C_Initialize")?;
    let session = open_session(&pkcs11, &cli.token_label, &pin)?;
    drop(pin);
    match cli.command {
        Cmd::Gen(g) => {
            let (public, private) = generate(&session, &g)?;
            if g.private_only {
                session.destroy_object(public).ctx("C_DestroyObject")?;
            }
            if g.public_only {
                session.destroy_object(private).ctx("C_DestroyObject")?;
            }
            println!("{}", hex::encode(&g.id.0));
            Ok(())
        }
        Cmd::Bulk(b) => bulk(&session, &b),
        Cmd::Demo => demo(&session),
        Cmd::RawData(r) => raw_data(&session, r),
        Cmd::RawEcPublic(r) => raw_ec_public(&session, r),
    }
}

fn raw_ec_public(session: &Session, r: RawEcPublicArgs) -> Res<()> {
    let curve = match r.kind {
        Kind::EcP256 => Curve::P256,
        Kind::EcP384 => Curve::P384,
        Kind::EcP521 => Curve::P521,
        _ => return Err("--kind of raw-ec-public is ec-p256, ec-p384 or ec-p521".into()),
    };
    let template = [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Id(r.id.0),
        Attribute::Label(r.label.into_bytes()),
        Attribute::EcParams(params(&curve)),
        Attribute::EcPoint(r.ec_point.0),
    ];
    session
        .create_object(&template)
        .map(drop)
        .ctx("C_CreateObject (EC public key)")
}

fn raw_data(session: &Session, r: RawDataArgs) -> Res<()> {
    let value = std::fs::read(&r.value_file).ctx(format!("reading {}", r.value_file.display()))?;
    let mut template = vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(r.label.into_bytes()),
        Attribute::Application(r.application.into_bytes()),
        Attribute::Value(value),
    ];
    let res = session.create_object(&template);
    wipe_values(&mut template);
    res.map(drop).ctx("C_CreateObject (data object)")
}

/// Reads the PIN file, dropping one trailing newline, without leaving
/// unzeroized copies of the PIN behind.
fn read_pin(path: &Path) -> Res<AuthPin> {
    let raw =
        Zeroizing::new(std::fs::read(path).ctx(format!("reading PIN file {}", path.display()))?);
    let mut pin: &[u8] = &raw;
    if let Some(rest) = pin.strip_suffix(b"\n") {
        pin = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    if pin.is_empty() {
        return Err(format!("PIN file {} is empty", path.display()));
    }
    let pin = std::str::from_utf8(pin)
        .map_err(|_| format!("PIN file {} is not valid UTF-8", path.display()))?;
    // Exact capacity, so the conversion to Box<str> inside SecretString
    // does not reallocate and leave a copy behind.
    let mut owned = String::with_capacity(pin.len());
    owned.push_str(pin);
    Ok(AuthPin::from(owned))
}

fn open_session(pkcs11: &Pkcs11, token_label: &str, pin: &AuthPin) -> Res<Session> {
    let slots = pkcs11.get_slots_with_token().ctx("C_GetSlotList")?;
    let mut found = Vec::new();
    for slot in slots {
        let info = pkcs11.get_token_info(slot).ctx("C_GetTokenInfo")?;
        let label = info.label().trim();
        if label == token_label {
            let session = pkcs11
                .open_rw_session(slot)
                .ctx(format!("C_OpenSession on token {token_label:?}"))?;
            session
                .login(UserType::User, Some(pin))
                .ctx(format!("C_Login on token {token_label:?}"))?;
            return Ok(session);
        }
        if !label.is_empty() {
            found.push(format!("{label:?}"));
        }
    }
    if found.is_empty() {
        return Err(format!(
            "no token labelled {token_label:?}: no initialized tokens found \
             (for SoftHSM2, is SOFTHSM2_CONF set?)"
        ));
    }
    Err(format!(
        "no token labelled {token_label:?}; tokens found: {}",
        found.join(", ")
    ))
}

/// All usage flags. SoftHSM defaults most of them to true, so every flag
/// applicable to the object class is set explicitly: only `on` ends up true.
const USAGE: [(AttributeType, MakeFlag); 7] = [
    (AttributeType::Encrypt, Attribute::Encrypt),
    (AttributeType::Decrypt, Attribute::Decrypt),
    (AttributeType::Sign, Attribute::Sign),
    (AttributeType::Verify, Attribute::Verify),
    (AttributeType::Wrap, Attribute::Wrap),
    (AttributeType::Unwrap, Attribute::Unwrap),
    (AttributeType::Derive, Attribute::Derive),
];

fn usage(class: ObjectClass, on: &[AttributeType]) -> impl Iterator<Item = Attribute> + '_ {
    use AttributeType as A;
    let not_applicable: &[A] = if class == ObjectClass::PUBLIC_KEY {
        &[A::Decrypt, A::Sign, A::Unwrap]
    } else if class == ObjectClass::PRIVATE_KEY {
        &[A::Encrypt, A::Verify, A::Wrap]
    } else {
        &[]
    };
    USAGE
        .iter()
        .filter(move |(t, _)| !not_applicable.contains(t))
        .map(move |(t, make)| make(on.contains(t)))
}

/// Attributes of one object of a `gen` call: class, key type, token,
/// privacy/sensitivity, id, label, modifiability and usage flags.
fn object(
    spec: &GenArgs,
    class: ObjectClass,
    key_type: KeyType,
    on: &[AttributeType],
) -> Vec<Attribute> {
    let secret = class != ObjectClass::PUBLIC_KEY;
    let mut t = vec![
        Attribute::Class(class),
        Attribute::KeyType(key_type),
        Attribute::Token(true),
        Attribute::Private(secret),
        Attribute::Id(spec.id.0.clone()),
        Attribute::Label(match (&spec.public_label, class) {
            (Some(l), ObjectClass::PUBLIC_KEY) => l.as_bytes().to_vec(),
            _ => spec.label.as_bytes().to_vec(),
        }),
    ];
    if secret {
        t.extend([
            Attribute::Sensitive(!spec.not_sensitive),
            Attribute::Extractable(spec.extractable),
        ]);
    }
    if spec.non_modifiable {
        t.push(Attribute::Modifiable(false));
    }
    if spec.non_destroyable {
        t.push(Attribute::Destroyable(false));
    }
    t.extend(usage(class, on));
    t
}

/// Generates the key described by `spec`. Returns (public, private) handles;
/// for a secret key both are the same handle.
fn generate(session: &Session, spec: &GenArgs) -> Res<(ObjectHandle, ObjectHandle)> {
    use AttributeType as A;
    let (mech, key_type, len) = match spec.kind {
        Kind::Aes256 => (Mechanism::AesKeyGen, KeyType::AES, 32u64),
        Kind::Aes128 => (Mechanism::AesKeyGen, KeyType::AES, 16),
        Kind::GenericSecret => (Mechanism::GenericSecretKeyGen, KeyType::GENERIC_SECRET, 32),
        Kind::EcP256 | Kind::EcP384 | Kind::EcP521 | Kind::Ed25519 | Kind::Rsa2048 => {
            return generate_pair(session, spec)
        }
    };
    let on = [A::Encrypt, A::Decrypt, A::Wrap, A::Unwrap];
    let mut t = object(spec, ObjectClass::SECRET_KEY, key_type, &on);
    t.push(Attribute::ValueLen(len.into()));
    let h = session.generate_key(&mech, &t).ctx("C_GenerateKey")?;
    Ok((h, h))
}

fn generate_pair(session: &Session, spec: &GenArgs) -> Res<(ObjectHandle, ObjectHandle)> {
    use AttributeType as A;
    let (mech, key_type, params) = match spec.kind {
        Kind::EcP256 => (Mechanism::EccKeyPairGen, KeyType::EC, params(&Curve::P256)),
        Kind::EcP384 => (Mechanism::EccKeyPairGen, KeyType::EC, params(&Curve::P384)),
        Kind::EcP521 => (Mechanism::EccKeyPairGen, KeyType::EC, params(&Curve::P521)),
        // SoftHSM 2.6.1 accepts both the RFC 8410 OID and the PrintableString
        // "edwards25519" (tested); the OID is the standard form.
        Kind::Ed25519 => (
            Mechanism::EccEdwardsKeyPairGen,
            KeyType::EC_EDWARDS,
            params(&Curve::Ed25519),
        ),
        _ => (Mechanism::RsaPkcsKeyPairGen, KeyType::RSA, Vec::new()),
    };
    let (pub_on, priv_on): (&[A], &[A]) = if key_type == KeyType::RSA {
        (
            &[A::Verify, A::Encrypt, A::Wrap],
            &[A::Sign, A::Decrypt, A::Unwrap],
        )
    } else {
        (&[A::Verify], &[A::Sign])
    };
    let mut public = object(spec, ObjectClass::PUBLIC_KEY, key_type, pub_on);
    let private = object(spec, ObjectClass::PRIVATE_KEY, key_type, priv_on);
    if key_type == KeyType::RSA {
        public.extend([
            Attribute::ModulusBits(2048u64.into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
        ]);
    } else {
        public.push(Attribute::EcParams(params));
    }
    session
        .generate_key_pair(&mech, &public, &private)
        .ctx("C_GenerateKeyPair")
}

/// CKA_EC_PARAMS of a curve, from hsmkeyd's one table of curve OIDs.
fn params(curve: &Curve) -> Vec<u8> {
    curve.params().unwrap_or_default().to_vec()
}

/// Zeroizes any CKA_VALUE held in a template after use.
fn wipe_values(template: &mut [Attribute]) {
    for attr in template.iter_mut() {
        if let Attribute::Value(v) = attr {
            v.zeroize();
        }
    }
}

/// SoftHSM's file backend rewrites a new token object's file once per
/// default attribute (~35 writes, ~10 ms per key), whereas C_CopyObject
/// writes the copy in one transaction. So each key is created as a session
/// object and copied to the token with CKA_TOKEN=true (about 5x faster).
fn bulk(session: &Session, b: &BulkArgs) -> Res<()> {
    let on = [AttributeType::Encrypt, AttributeType::Decrypt];
    let mut value = Zeroizing::new([0u8; 32]);
    for index in 0..b.count {
        OsRng.try_fill_bytes(&mut value[..]).ctx("OS RNG")?;
        let mut id = b.id_prefix.0.clone();
        id.extend_from_slice(&index.to_be_bytes());
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Id(id),
            Attribute::Label(format!("{}{index}", b.label_prefix).into_bytes()),
            Attribute::Value(value.to_vec()),
        ];
        template.extend(usage(ObjectClass::SECRET_KEY, &on));
        let res = session.create_object(&template);
        wipe_values(&mut template);
        let temp = res.ctx(format!("C_CreateObject (bulk key {index})"))?;
        let copied = session.copy_object(temp, &[Attribute::Token(true)]);
        session.destroy_object(temp).ctx("C_DestroyObject")?;
        copied.ctx(format!("C_CopyObject (bulk key {index})"))?;
    }
    println!("created {} AES-256 keys", b.count);
    Ok(())
}

/// Returns the hex CKA_ID of an existing key object with this label, if any.
fn find_key_by_label(session: &Session, label: &str) -> Res<Option<String>> {
    let handles = session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .ctx(format!("C_FindObjects (label {label:?})"))?;
    for h in handles {
        let attrs = session
            .get_attributes(h, &[AttributeType::Class, AttributeType::Id])
            .ctx("C_GetAttributeValue")?;
        if let [Attribute::Class(class), Attribute::Id(id)] = &attrs[..] {
            if KEY_CLASSES.contains(class) {
                return Ok(Some(hex::encode(id)));
            }
        }
    }
    Ok(None)
}

const KEY_CLASSES: [ObjectClass; 3] = [
    ObjectClass::SECRET_KEY,
    ObjectClass::PRIVATE_KEY,
    ObjectClass::PUBLIC_KEY,
];

fn demo(session: &Session) -> Res<()> {
    let keys = [
        ("demo-aes", Kind::Aes256, false),
        ("demo-ec-p256", Kind::EcP256, false),
        ("demo-rsa-2048", Kind::Rsa2048, false),
        ("demo-aes-locked", Kind::Aes256, true),
    ];
    for (label, kind, non_modifiable) in keys {
        if let Some(kid) = find_key_by_label(session, label)? {
            println!("{kid}  {label}  exists");
            continue;
        }
        let mut id = vec![0u8; 16];
        OsRng.try_fill_bytes(&mut id).ctx("OS RNG")?;
        let spec = GenArgs {
            kind,
            id: Hex(id),
            label: label.into(),
            public_label: None,
            non_modifiable,
            non_destroyable: false,
            not_sensitive: false,
            extractable: false,
            private_only: false,
            public_only: false,
        };
        generate(session, &spec)?;
        println!("{}  {label}  created", hex::encode(&spec.id.0));
    }
    Ok(())
}
