"""HL7 v2 results to a RIS: the ORU^R01 a result becomes (oru) and its MLLP transport (mllp)."""
