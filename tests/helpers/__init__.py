"""What several test modules share: fixtures' building blocks, fakes and scripted data (no test module
imports another)."""
