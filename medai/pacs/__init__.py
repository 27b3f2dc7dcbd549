"""DICOM networking: C-STORE SCP, study stability and job queue, Orthanc follower, result sender."""
