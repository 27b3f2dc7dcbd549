"""medai's trust boundary: audit trail, egress guard and telemetry switches,
session attestation, keys. Small and free of ML imports on purpose, so an
auditor can read it in one sitting. Installed as ``medai.compliance``."""
