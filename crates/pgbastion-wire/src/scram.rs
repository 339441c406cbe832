//! The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) for upstream logins, without channel
//! binding.
//!
//! The salted password (4,096 rounds of HMAC-SHA-256 by PostgreSQL's default) is remembered
//! per password, salt and round count: a role's stored verifier keeps its salt until its
//! password changes, so after the first login each new upstream connection costs a few
//! HMACs instead of thousands, and the thread running the login is not held for
//! milliseconds while every session on it waits. The first derivation runs on a blocking
//! thread (see `upstream::authenticate`).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ring::{digest, hmac, pbkdf2};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Mutex, OnceLock};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// Salted passwords remembered; beyond this many the memory starts again.
const REMEMBERED: usize = 256;

/// Round counts refused above this (PostgreSQL's default is 4,096): a server asking for more
/// would hold the proxy's thread for a first login.
const MAX_ITERATIONS: u32 = 100_000;
/// Round counts refused below this (RFC 7677's minimum, PostgreSQL's default): an impostor
/// asking for fewer would get a proof whose password is cheap to guess offline.
const MIN_ITERATIONS: u32 = 4096;

/// One exchange: `client_first`, then `client_final` with the server's first message, then
/// `verify` of the server's final message.
pub struct Exchange {
    /// Empty for PostgreSQL, which takes the user from the startup packet.
    user: String,
    password: Vec<u8>,
    nonce: String,
    /// Set by `client_final`: the server key and the AuthMessage it signs.
    pending: Option<(hmac::Key, String)>,
    /// Set by `verify`: the server proved it knows the password.
    verified: bool,
}

impl std::fmt::Debug for Exchange {
    /// Never the password or the keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("nonce", &self.nonce)
            .field("answered", &self.pending.is_some())
            .finish()
    }
}

impl Exchange {
    pub fn new(password: &str) -> Exchange {
        let nonce: [u8; 18] = rand::random();
        Exchange::with_nonce("", password, BASE64.encode(nonce))
    }

    fn with_nonce(user: &str, password: &str, nonce: String) -> Exchange {
        // SASLprep, as PostgreSQL applies it; a password it rejects is used as it is (so
        // does the server).
        let password = match stringprep::saslprep(password) {
            // An owned result moves into the exchange (and is zeroized with it).
            Ok(std::borrow::Cow::Owned(prepared)) => prepared.into_bytes(),
            Ok(std::borrow::Cow::Borrowed(_)) | Err(_) => password.as_bytes().to_vec(),
        };
        Exchange {
            user: user.to_string(),
            password,
            nonce,
            pending: None,
            verified: false,
        }
    }

    /// The client-first-message.
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare())
    }

    fn client_first_bare(&self) -> String {
        format!("n={},r={}", self.user, self.nonce)
    }

    /// The client-final-message answering the server-first-message. Derives the salted
    /// password in place when it is not remembered; `authenticate` does that on a blocking
    /// thread instead (`read_server_first`, `remembered`, `salting`, `answer`).
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<String, String> {
        let first = self.read_server_first(server_first)?;
        let salted = self.salting(&first)();
        Ok(self.answer(&first, &salted))
    }

    /// Reads and checks the server-first-message.
    pub fn read_server_first(&self, server_first: &[u8]) -> Result<ServerFirst, String> {
        if self.pending.is_some() {
            return Err("the server sent its first message twice".into());
        }
        let text = std::str::from_utf8(server_first)
            .map_err(|_| "the server's first message is not UTF-8".to_string())?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attribute in text.split(',') {
            match attribute.split_once('=') {
                // A mandatory extension this client does not know ends the exchange (RFC 5802).
                Some(("m", _)) => return Err("the server requires an unknown extension".into()),
                Some(("r", value)) => nonce = Some(value),
                Some(("s", value)) => salt = Some(value),
                Some(("i", value)) => iterations = Some(value),
                _ => {}
            }
        }
        let nonce = nonce.ok_or("the server's first message has no nonce")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("the server's nonce does not extend the client's".into());
        }
        let salt = BASE64
            .decode(salt.ok_or("the server's first message has no salt")?)
            .map_err(|_| "the server's salt is not base64".to_string())?;
        let iterations: u32 = iterations
            .ok_or("the server's first message has no iteration count")?
            .parse()
            .map_err(|_| "the server's iteration count is not a number".to_string())?;
        let iterations = NonZeroU32::new(iterations)
            .filter(|n| (MIN_ITERATIONS..=MAX_ITERATIONS).contains(&n.get()))
            .ok_or_else(|| {
                format!(
                    "the server asks for {iterations} iterations; pgbastion answers \
                     {MIN_ITERATIONS} to {MAX_ITERATIONS} (fewer would make its proof cheap \
                     to crack; set scram_iterations upstream and the role's password again)"
                )
            })?;
        Ok(ServerFirst {
            text: text.to_string(),
            nonce: nonce.to_string(),
            salt,
            iterations,
        })
    }

    /// The salted password, when an earlier login derived it.
    pub fn remembered(&self, first: &ServerFirst) -> Option<Zeroizing<[u8; 32]>> {
        let key = remember_key(&self.password, first);
        remembered()
            .lock()
            .expect("scram memory lock")
            .get(&key)
            .cloned()
    }

    /// Derives (thousands of HMACs: milliseconds) and remembers the salted password; for a
    /// blocking thread.
    pub fn salting(
        &self,
        first: &ServerFirst,
    ) -> impl FnOnce() -> Zeroizing<[u8; 32]> + Send + 'static {
        let password = Zeroizing::new(self.password.clone());
        let (salt, iterations) = (first.salt.clone(), first.iterations);
        let key = remember_key(&self.password, first);
        move || {
            if let Some(salted) = remembered().lock().expect("scram memory lock").get(&key) {
                return salted.clone();
            }
            let mut salted = Zeroizing::new([0u8; 32]);
            pbkdf2::derive(
                pbkdf2::PBKDF2_HMAC_SHA256,
                iterations,
                &salt,
                &password,
                salted.as_mut(),
            );
            let mut remembered = remembered().lock().expect("scram memory lock");
            if remembered.len() >= REMEMBERED {
                remembered.clear();
            }
            remembered.insert(key, salted.clone());
            salted
        }
    }

    /// The client-final-message, with the proof made from the salted password.
    pub fn answer(&mut self, first: &ServerFirst, salted: &[u8; 32]) -> String {
        let salted = hmac::Key::new(hmac::HMAC_SHA256, salted);
        let client_key = hmac::sign(&salted, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        let without_proof = format!("c=biws,r={}", first.nonce);
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare(),
            first.text
        );
        let signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(signature.as_ref())
            .map(|(key, sig)| key ^ sig)
            .collect();
        let server_key = hmac::sign(&salted, b"Server Key");
        self.pending = Some((
            hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth_message,
        ));
        format!("{without_proof},p={}", BASE64.encode(proof))
    }

    /// Whether the server's final message was checked.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// Checks the server-final-message: the server proves it knows the password too.
    pub fn verify(&mut self, server_final: &[u8]) -> Result<(), String> {
        if self.verified {
            return Err("the server sent its final message twice".into());
        }
        let (server_key, auth_message) = self
            .pending
            .as_ref()
            .ok_or("the server's final message came before its first")?;
        let server_final = std::str::from_utf8(server_final)
            .map_err(|_| "the server's final message is not UTF-8".to_string())?;
        if let Some(error) = server_final.strip_prefix("e=") {
            return Err(format!("the server refused the exchange: {error}"));
        }
        let claimed = server_final
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .and_then(|v| BASE64.decode(v).ok())
            .ok_or("the server's final message has no signature")?;
        let expected = hmac::sign(server_key, auth_message.as_bytes());
        match bool::from(expected.as_ref().ct_eq(claimed.as_slice())) {
            true => {
                self.verified = true;
                Ok(())
            }
            false => Err("the server's signature is wrong".into()),
        }
    }
}

/// The server-first-message, read.
#[derive(Debug)]
pub struct ServerFirst {
    text: String,
    nonce: String,
    salt: Vec<u8>,
    iterations: NonZeroU32,
}

/// Salted passwords (Hi(password, salt, i) of RFC 5802) by a digest of the password (never the
/// password itself), the salt and the round count.
type Remembered = HashMap<(Vec<u8>, Vec<u8>, u32), Zeroizing<[u8; 32]>>;

fn remembered() -> &'static Mutex<Remembered> {
    static REMEMBERED_KEYS: OnceLock<Mutex<Remembered>> = OnceLock::new();
    REMEMBERED_KEYS.get_or_init(Mutex::default)
}

fn remember_key(password: &[u8], first: &ServerFirst) -> (Vec<u8>, Vec<u8>, u32) {
    (
        digest::digest(&digest::SHA256, password).as_ref().to_vec(),
        first.salt.clone(),
        first.iterations.get(),
    )
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.password.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exchange of RFC 7677, section 3: user "user", password "pencil".
    #[test]
    fn the_rfc_7677_exchange() {
        let mut exchange = Exchange::with_nonce("user", "pencil", "rOprNGfwEbeRWgbNEkqO".into());
        assert_eq!(exchange.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                            s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        assert_eq!(
            exchange.client_final(server_first.as_bytes()).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert!(exchange
            .verify(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .is_err());
        assert!(exchange.verify(b"e=invalid-proof").is_err());
        assert!(!exchange.verified());
        exchange
            .verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(exchange.verified());
        // Each message once, in order.
        assert!(exchange
            .verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .is_err());
        assert!(exchange.client_final(server_first.as_bytes()).is_err());
        // PostgreSQL's form: the user is in the startup packet.
        assert_eq!(
            Exchange::new("pencil").client_first().len(),
            "n,,n=,r=".len() + 24
        );
    }

    #[test]
    fn a_server_first_message_that_does_not_fit_is_refused() {
        for server_first in [
            "r=other,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=abc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=abcX,s=***,i=4096",
            "r=abcX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            "r=abcX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999",
            "r=abcX,i=4096",
            "m=ext,r=abcX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=abcX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=100001",
            "r=abcX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4095",
            "r=abcX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",
        ] {
            let mut exchange = Exchange::with_nonce("", "pencil", "abc".into());
            assert!(
                exchange.client_final(server_first.as_bytes()).is_err(),
                "{server_first}"
            );
        }
        let mut exchange = Exchange::with_nonce("", "pencil", "abc".into());
        assert!(exchange.verify(b"v=AAAA").is_err());
    }
}
