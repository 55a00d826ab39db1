"""What every agency's datasets share: value types and check digits (`checks`), dataset
schemas (`schema`), reading a CSV file with exact error positions (`csvread`), the store
adapter (`store`), the loader (`loader`) and catalog views (`view`)."""
