"""hsm-setup: PKCS#11 tokens, keys and an HSM-signed device PKI."""
