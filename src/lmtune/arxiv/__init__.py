"""Everything arXiv: ids, the API client and its feed, fetching data sets and papers by id, the `arxiv_api` source."""
