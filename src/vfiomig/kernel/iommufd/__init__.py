"""iommufd: /dev/iommu, its object table and commands (drivers/iommu/iommufd/)."""
