"""Applications built on detr's public API and predictors: a customer-service assistant
(`assistant`), a sentiment monitor with alerts (`monitor`, `report`) and text-based
recommendation (`recommend`). Their state lives in SQLite,
written in transactions, so a crash loses nothing acknowledged."""
