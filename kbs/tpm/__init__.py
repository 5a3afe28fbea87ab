"""TPM structures the broker handles in software (no TPM of its own).

``objects`` parses the public areas nodes send (EK, AK); ``ekcert`` checks EK certificates
against the manufacturers' roots; ``credential`` makes credential-activation challenges and
outer wrappers to an EK; ``sealing`` builds the TPM import blob a release is sealed in.
"""
