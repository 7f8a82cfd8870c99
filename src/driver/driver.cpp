// Work in progress: replaced by the real driver (issue 3). Every call fails clearly for now.
#include "layerd/driver/driver.hpp"

#include "layerd/sys/error.hpp"

namespace layerd::driver {

struct Driver::Impl {
  DriverConfig config;
  DriverMetrics metrics;
};

namespace {
[[noreturn]] void unavailable(const char* call) {
  throw Error(ENOSYS, std::string(call) + " is not implemented yet");
}
}  // namespace

Driver::Driver(DriverConfig config) : impl_(std::make_unique<Impl>(Impl{std::move(config), {}})) {}
Driver::~Driver() = default;
core::Task<void> Driver::start() { co_return; }
core::Task<void> Driver::init(InitRequest) { unavailable("Init"); co_return; }
core::Task<void> Driver::create(CreateRequest) { unavailable("Create"); co_return; }
core::Task<void> Driver::remove(std::string) { unavailable("Remove"); co_return; }
core::Task<std::string> Driver::get(std::string, std::string) { unavailable("Get"); co_return ""; }
core::Task<void> Driver::put(std::string) { unavailable("Put"); co_return; }
core::Task<bool> Driver::exists(std::string) { unavailable("Exists"); co_return false; }
core::Task<std::map<std::string, std::string>> Driver::metadata(std::string) {
  unavailable("GetMetadata");
  co_return {};
}
core::Task<std::vector<std::pair<std::string, std::string>>> Driver::status() { co_return {}; }
core::Task<void> Driver::cleanup() { co_return; }
core::Task<std::uint64_t> Driver::apply_diff(std::string, std::string, archive::ByteSource&) {
  unavailable("ApplyDiff");
  co_return 0;
}
core::Task<void> Driver::diff(std::string, std::string, archive::ByteSink&) {
  unavailable("Diff");
  co_return;
}
core::Task<std::vector<Change>> Driver::changes(std::string, std::string) {
  unavailable("Changes");
  co_return {};
}
core::Task<std::uint64_t> Driver::diff_size(std::string, std::string) {
  unavailable("DiffSize");
  co_return 0;
}
std::vector<LayerInfo> Driver::layers() const { return {}; }
const DriverMetrics& Driver::metrics() const noexcept { return impl_->metrics; }
std::size_t Driver::active_mounts() const noexcept { return 0; }
const std::string& Driver::home() const noexcept { return impl_->config.default_home; }
std::uint64_t Driver::subscribe(EventHandler) { return 0; }
void Driver::unsubscribe(std::uint64_t) {}

}  // namespace layerd::driver
