"""The simulated device: identity from a PKCS#11 token, chain, mTLS transport, DPS flow."""
