"""Audit & privacy: this session's events, chain verification, network attempts, attestation."""

from __future__ import annotations

import streamlit as st

from medai import workstation

st.title("Audit & privacy")

status = workstation.privacy_status()
c1, c2, c3 = st.columns(3)
c1.metric("Audit chain", "verified" if status.chain_ok else "PROBLEM", border=True)
c2.metric("Network attempts allowed", status.allowed_total, border=True,
          help="Connections to this machine (loopback) and configured destinations")
c3.metric("Network attempts blocked", status.blocked_total, border=True)
if status.problems:
    st.error("Audit trail problems:\n\n" + "\n".join(f"- {p}" for p in status.problems))
switched = sum(status.telemetry.values())
st.caption(f"{status.records} records in the trail, {status.checkpoints} signed checkpoints · "
           f"egress guard {'on' if status.egress_guard else 'OFF'} · "
           f"telemetry switches off: {switched}/{len(status.telemetry)}")
with st.expander("Network attempts by destination class, telemetry switches"):
    st.json({"network": status.network, "telemetry_off": status.telemetry}, expanded=True)

st.subheader("This session's events")
events = workstation.session_events()
if events:
    st.dataframe(events, hide_index=True, width="stretch")
else:
    st.caption("No events recorded in this session yet.")

st.subheader("Session attestation")
st.markdown("A signed statement of what this session accessed, what it sent and which network "
            "attempts were allowed or blocked; verifiable with `medai audit verify-attestation`.")
if st.button("Write signed attestation", icon=":material/verified:", type="primary", key="attest-button"):
    try:
        path = workstation.write_attestation()
    except Exception as exc:  # noqa: BLE001
        st.error(f"No attestation written: {exc}")
    else:
        st.success(f"Attestation written to `{path}`")
