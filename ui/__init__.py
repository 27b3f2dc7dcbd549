"""The Streamlit workstation page (installed as ``medai.ui``). Pages call medai; no business logic here."""
